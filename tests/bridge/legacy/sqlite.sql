-- The schema mqchat 0.x created with create_all before migrations (sqlite3 .schema).
CREATE TABLE users (
	user_id VARCHAR(64) NOT NULL, 
	password_hash VARCHAR NOT NULL, 
	last_seq BIGINT NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (user_id)
);
CREATE TABLE groups (
	group_id VARCHAR(64) NOT NULL, 
	name VARCHAR(100) NOT NULL, 
	owner VARCHAR(64) NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (group_id), 
	FOREIGN KEY(owner) REFERENCES users (user_id)
);
CREATE TABLE device_cursors (
	user_id VARCHAR(64) NOT NULL, 
	device_id VARCHAR(64) NOT NULL, 
	acked_seq BIGINT NOT NULL, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (user_id, device_id), 
	FOREIGN KEY(user_id) REFERENCES users (user_id)
);
CREATE TABLE conversation_marks (
	user_id VARCHAR(64) NOT NULL, 
	conversation_id VARCHAR(72) NOT NULL, 
	delivered_upto BIGINT NOT NULL, 
	delivered_at DATETIME, 
	read_upto BIGINT NOT NULL, 
	read_at DATETIME, 
	PRIMARY KEY (user_id, conversation_id), 
	FOREIGN KEY(user_id) REFERENCES users (user_id)
);
CREATE TABLE device_revocations (
	user_id VARCHAR(64) NOT NULL, 
	device_id VARCHAR(64) NOT NULL, 
	revoked_at_ms BIGINT NOT NULL, 
	PRIMARY KEY (user_id, device_id), 
	FOREIGN KEY(user_id) REFERENCES users (user_id)
);
CREATE TABLE group_members (
	group_id VARCHAR(64) NOT NULL, 
	user_id VARCHAR(64) NOT NULL, 
	active BOOLEAN NOT NULL, 
	joined_at DATETIME NOT NULL, 
	PRIMARY KEY (group_id, user_id), 
	FOREIGN KEY(group_id) REFERENCES groups (group_id), 
	FOREIGN KEY(user_id) REFERENCES users (user_id)
);
CREATE INDEX ix_group_members_user ON group_members (user_id, active);
CREATE TABLE messages (
	id INTEGER NOT NULL, 
	sender VARCHAR(64) NOT NULL, 
	client_msg_id VARCHAR(64) NOT NULL, 
	to_user VARCHAR(64), 
	group_id VARCHAR(64), 
	content TEXT NOT NULL, 
	msg_type VARCHAR(16) NOT NULL, 
	sender_seq BIGINT NOT NULL, 
	created_at DATETIME NOT NULL, 
	recalled_at DATETIME, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_messages_sender_client_msg_id UNIQUE (sender, client_msg_id), 
	FOREIGN KEY(sender) REFERENCES users (user_id), 
	FOREIGN KEY(to_user) REFERENCES users (user_id), 
	FOREIGN KEY(group_id) REFERENCES groups (group_id)
);
CREATE TABLE stream_events (
	user_id VARCHAR(64) NOT NULL, 
	seq BIGINT NOT NULL, 
	kind VARCHAR(32) NOT NULL, 
	conversation_id VARCHAR(72), 
	message_id INTEGER, 
	payload TEXT, 
	PRIMARY KEY (user_id, seq), 
	FOREIGN KEY(user_id) REFERENCES users (user_id), 
	FOREIGN KEY(message_id) REFERENCES messages (id)
);
CREATE INDEX ix_stream_events_message ON stream_events (message_id);
CREATE INDEX ix_stream_events_conversation ON stream_events (user_id, conversation_id, message_id);
