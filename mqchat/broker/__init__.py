"""The MQTT broker: connections, sessions, the topic ACL and delivery; amqtt hosts the listeners."""
