"""mqchat: a self-hostable instant-messaging backend built on MQTT."""

__version__ = "0.1.0"
