"""``mqchat bench``: drives real MQTT load at mqchat, plain amqtt and Mosquitto, and reports."""
