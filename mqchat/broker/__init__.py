"""The embedded amqtt broker: listeners, token auth, the topic ACL and the bridge plugin."""
