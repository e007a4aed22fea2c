-- The schema mqchat 0.x created with create_all before migrations (pg_dump --schema-only).
CREATE TABLE public.conversation_marks (
    user_id character varying(64) NOT NULL,
    conversation_id character varying(72) NOT NULL,
    delivered_upto bigint NOT NULL,
    delivered_at timestamp with time zone,
    read_upto bigint NOT NULL,
    read_at timestamp with time zone
);
CREATE TABLE public.device_cursors (
    user_id character varying(64) NOT NULL,
    device_id character varying(64) NOT NULL,
    acked_seq bigint NOT NULL,
    updated_at timestamp with time zone NOT NULL
);
CREATE TABLE public.device_revocations (
    user_id character varying(64) NOT NULL,
    device_id character varying(64) NOT NULL,
    revoked_at_ms bigint NOT NULL
);
CREATE TABLE public.group_members (
    group_id character varying(64) NOT NULL,
    user_id character varying(64) NOT NULL,
    active boolean NOT NULL,
    joined_at timestamp with time zone NOT NULL
);
CREATE TABLE public.groups (
    group_id character varying(64) NOT NULL,
    name character varying(100) NOT NULL,
    owner character varying(64) NOT NULL,
    created_at timestamp with time zone NOT NULL
);
CREATE TABLE public.messages (
    id bigint NOT NULL,
    sender character varying(64) NOT NULL,
    client_msg_id character varying(64) NOT NULL,
    to_user character varying(64),
    group_id character varying(64),
    content text NOT NULL,
    msg_type character varying(16) NOT NULL,
    sender_seq bigint NOT NULL,
    created_at timestamp with time zone NOT NULL,
    recalled_at timestamp with time zone
);
CREATE SEQUENCE public.messages_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;
ALTER SEQUENCE public.messages_id_seq OWNED BY public.messages.id;
CREATE TABLE public.stream_events (
    user_id character varying(64) NOT NULL,
    seq bigint NOT NULL,
    kind character varying(32) NOT NULL,
    conversation_id character varying(72),
    message_id bigint,
    payload text
);
CREATE TABLE public.users (
    user_id character varying(64) NOT NULL,
    password_hash character varying NOT NULL,
    last_seq bigint NOT NULL,
    created_at timestamp with time zone NOT NULL
);
ALTER TABLE ONLY public.messages ALTER COLUMN id SET DEFAULT nextval('public.messages_id_seq'::regclass);
ALTER TABLE ONLY public.conversation_marks
    ADD CONSTRAINT conversation_marks_pkey PRIMARY KEY (user_id, conversation_id);
ALTER TABLE ONLY public.device_cursors
    ADD CONSTRAINT device_cursors_pkey PRIMARY KEY (user_id, device_id);
ALTER TABLE ONLY public.device_revocations
    ADD CONSTRAINT device_revocations_pkey PRIMARY KEY (user_id, device_id);
ALTER TABLE ONLY public.group_members
    ADD CONSTRAINT group_members_pkey PRIMARY KEY (group_id, user_id);
ALTER TABLE ONLY public.groups
    ADD CONSTRAINT groups_pkey PRIMARY KEY (group_id);
ALTER TABLE ONLY public.messages
    ADD CONSTRAINT messages_pkey PRIMARY KEY (id);
ALTER TABLE ONLY public.stream_events
    ADD CONSTRAINT stream_events_pkey PRIMARY KEY (user_id, seq);
ALTER TABLE ONLY public.messages
    ADD CONSTRAINT uq_messages_sender_client_msg_id UNIQUE (sender, client_msg_id);
ALTER TABLE ONLY public.users
    ADD CONSTRAINT users_pkey PRIMARY KEY (user_id);
CREATE INDEX ix_group_members_user ON public.group_members USING btree (user_id, active);
CREATE INDEX ix_stream_events_conversation ON public.stream_events USING btree (user_id, conversation_id, message_id);
CREATE INDEX ix_stream_events_message ON public.stream_events USING btree (message_id);
ALTER TABLE ONLY public.conversation_marks
    ADD CONSTRAINT conversation_marks_user_id_fkey FOREIGN KEY (user_id) REFERENCES public.users(user_id);
ALTER TABLE ONLY public.device_cursors
    ADD CONSTRAINT device_cursors_user_id_fkey FOREIGN KEY (user_id) REFERENCES public.users(user_id);
ALTER TABLE ONLY public.device_revocations
    ADD CONSTRAINT device_revocations_user_id_fkey FOREIGN KEY (user_id) REFERENCES public.users(user_id);
ALTER TABLE ONLY public.group_members
    ADD CONSTRAINT group_members_group_id_fkey FOREIGN KEY (group_id) REFERENCES public.groups(group_id);
ALTER TABLE ONLY public.group_members
    ADD CONSTRAINT group_members_user_id_fkey FOREIGN KEY (user_id) REFERENCES public.users(user_id);
ALTER TABLE ONLY public.groups
    ADD CONSTRAINT groups_owner_fkey FOREIGN KEY (owner) REFERENCES public.users(user_id);
ALTER TABLE ONLY public.messages
    ADD CONSTRAINT messages_group_id_fkey FOREIGN KEY (group_id) REFERENCES public.groups(group_id);
ALTER TABLE ONLY public.messages
    ADD CONSTRAINT messages_sender_fkey FOREIGN KEY (sender) REFERENCES public.users(user_id);
ALTER TABLE ONLY public.messages
    ADD CONSTRAINT messages_to_user_fkey FOREIGN KEY (to_user) REFERENCES public.users(user_id);
ALTER TABLE ONLY public.stream_events
    ADD CONSTRAINT stream_events_message_id_fkey FOREIGN KEY (message_id) REFERENCES public.messages(id);
ALTER TABLE ONLY public.stream_events
    ADD CONSTRAINT stream_events_user_id_fkey FOREIGN KEY (user_id) REFERENCES public.users(user_id);
