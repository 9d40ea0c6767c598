-- A docket.db as the last server before Alembic (commit 2a41cfc, hand-written schema
-- version 7) wrote it, for tests/test_sql_store.py: made by that commit's SqlMetadataStore
-- (open(), then add_blob x2, put_manifest app:1 and app:latest, save_rollout_changes of a
-- finished one-host rollout with four records, save_token, save_identity, upsert_agent,
-- add_audit, save_pull), then `sqlite3 docket.db .dump`. Do not regenerate with newer code.
PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE schema_migrations (
	version INTEGER NOT NULL, 
	apply_time DATETIME NOT NULL, 
	PRIMARY KEY (version)
);
INSERT INTO schema_migrations VALUES(1,'2026-12-01 18:25:52.192353');
INSERT INTO schema_migrations VALUES(2,'2026-12-01 18:25:52.197890');
INSERT INTO schema_migrations VALUES(3,'2026-12-01 18:25:52.209325');
INSERT INTO schema_migrations VALUES(4,'2026-12-01 18:25:52.211703');
INSERT INTO schema_migrations VALUES(5,'2026-12-01 18:25:52.234026');
INSERT INTO schema_migrations VALUES(6,'2026-12-01 18:25:52.239594');
INSERT INTO schema_migrations VALUES(7,'2026-12-01 18:25:52.247952');
CREATE TABLE blobs (
	digest VARCHAR(71) NOT NULL, 
	size_bytes BIGINT NOT NULL, 
	create_time DATETIME NOT NULL, 
	metainfo BLOB, 
	info_hash VARCHAR(40), 
	piece_length INTEGER, 
	piece_count INTEGER, 
	PRIMARY KEY (digest)
);
INSERT INTO blobs VALUES('sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc',1234,'2026-11-30 12:00:00.250000',NULL,NULL,NULL,NULL);
INSERT INTO blobs VALUES('sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa',2097152,'2026-11-30 12:00:00.250000',NULL,NULL,NULL,NULL);
CREATE TABLE agents (
	name VARCHAR(64) NOT NULL, 
	agent_id VARCHAR(64) NOT NULL, 
	groups TEXT NOT NULL, 
	labels TEXT NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	version VARCHAR(64) NOT NULL, 
	peer_address VARCHAR(255) NOT NULL, 
	bt_endpoint VARCHAR(255) NOT NULL, 
	docker_version VARCHAR(64) NOT NULL, 
	docker_error TEXT NOT NULL, 
	disk_free_bytes BIGINT NOT NULL, 
	cached_digests TEXT NOT NULL, 
	connect_time DATETIME NOT NULL, 
	last_seen_time DATETIME NOT NULL, 
	create_time DATETIME NOT NULL, 
	platform VARCHAR(128) DEFAULT '' NOT NULL, 
	PRIMARY KEY (name)
);
INSERT INTO agents VALUES('h1','id-h1','["web"]','{}','offline','0.1.0','10.0.0.5:40000','','','',0,'[]','2026-11-30 12:00:00.250000','2026-11-30 12:00:00.250000','2026-11-30 12:00:00.250000','linux/amd64');
CREATE TABLE rollouts (
	id VARCHAR(32) NOT NULL, 
	image TEXT NOT NULL, 
	selector TEXT NOT NULL, 
	prefetch_only BOOLEAN NOT NULL, 
	canary INTEGER NOT NULL, 
	max_parallel INTEGER NOT NULL, 
	max_failures INTEGER NOT NULL, 
	deadline_time DATETIME NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	reason TEXT NOT NULL, 
	cancelled BOOLEAN NOT NULL, 
	create_time DATETIME NOT NULL, 
	end_time DATETIME, 
	PRIMARY KEY (id)
);
INSERT INTO rollouts VALUES('r1','{"repository": "app", "tag": "1", "digest": "sha256:4603ce06e5aafcc0157dc38c7cf5ecbfcb4bfaf2a705d0d021f0c18618624d20", "media_type": "application/vnd.oci.image.manifest.v1+json", "artifact_type": "", "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc", "size": 1234}, "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "size": 2097152}], "diff_ids": ["sha256:dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd"], "build_time": null, "create_time": "2026-11-30T12:00:00.250000+00:00", "platform": "linux/amd64", "manifests": []}','g',1,0,0,0,'2026-11-30 13:00:00.250000','succeeded','',0,'2026-11-30 12:00:00.250000','2026-11-30 12:00:04.250000');
CREATE TABLE rollout_tasks (
	order_id VARCHAR(32) NOT NULL, 
	rollout_id VARCHAR(32) NOT NULL, 
	agent VARCHAR(64) NOT NULL, 
	load BOOLEAN NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	error TEXT NOT NULL, 
	image_id VARCHAR(71) NOT NULL, 
	cached_bytes BIGINT NOT NULL, 
	bittorrent_bytes BIGINT NOT NULL, 
	server_bytes BIGINT NOT NULL, 
	fallback_bytes BIGINT NOT NULL, 
	start_time DATETIME, 
	first_piece_bytes BIGINT DEFAULT '0' NOT NULL, 
	end_time DATETIME, 
	image TEXT, 
	PRIMARY KEY (order_id), 
	FOREIGN KEY(rollout_id) REFERENCES rollouts (id)
);
INSERT INTO rollout_tasks VALUES('o1','r1','h1',0,'succeeded','','',0,2097152,0,0,'2026-11-30 12:00:00.250000',0,'2026-11-30 12:00:03.250000',NULL);
CREATE TABLE rollout_records (
	id INTEGER NOT NULL, 
	rollout_id VARCHAR(32) NOT NULL, 
	record_time DATETIME NOT NULL, 
	agent VARCHAR(64) NOT NULL, 
	task_state VARCHAR(16), 
	rollout_state VARCHAR(16), 
	message TEXT NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(rollout_id) REFERENCES rollouts (id)
);
INSERT INTO rollout_records VALUES(1,'r1','2026-11-30 12:00:00.250000','',NULL,'running','started: app:1 to 1 hosts');
INSERT INTO rollout_records VALUES(2,'r1','2026-11-30 12:00:00.250000','h1','pending',NULL,'');
INSERT INTO rollout_records VALUES(3,'r1','2026-11-30 12:00:03.250000','h1','succeeded',NULL,'');
INSERT INTO rollout_records VALUES(4,'r1','2026-11-30 12:00:04.250000','',NULL,'succeeded','done');
CREATE TABLE manifests (
	id INTEGER NOT NULL, 
	repository VARCHAR(255) NOT NULL, 
	digest VARCHAR(71) NOT NULL, 
	media_type VARCHAR(255) NOT NULL, 
	content BLOB NOT NULL, 
	config_digest VARCHAR(71), 
	config_size_bytes BIGINT, 
	config_media_type VARCHAR(255), 
	diff_ids TEXT NOT NULL, 
	build_time DATETIME, 
	platform VARCHAR(128) NOT NULL, 
	artifact_type VARCHAR(255) NOT NULL, 
	subject_digest VARCHAR(71), 
	subject_size_bytes BIGINT, 
	subject_media_type VARCHAR(255), 
	create_time DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_manifests_digest UNIQUE (repository, digest), 
	FOREIGN KEY(config_digest) REFERENCES blobs (digest)
);
INSERT INTO manifests VALUES(1,'app','sha256:4603ce06e5aafcc0157dc38c7cf5ecbfcb4bfaf2a705d0d021f0c18618624d20','application/vnd.oci.image.manifest.v1+json',X'7b22636f6e666967223a7b22646967657374223a227368613235363a63636363636363636363636363636363636363636363636363636363636363636363636363636363636363636363636363636363636363636363636363636363222c226d6564696154797065223a226170706c69636174696f6e2f766e642e6f63692e696d6167652e636f6e6669672e76312b6a736f6e222c2273697a65223a313233347d2c226c6179657273223a5b7b22646967657374223a227368613235363a61616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161222c226d6564696154797065223a226170706c69636174696f6e2f766e642e6f63692e696d6167652e6c617965722e76312e746172222c2273697a65223a323039373135327d5d2c226d6564696154797065223a226170706c69636174696f6e2f766e642e6f63692e696d6167652e6d616e69666573742e76312b6a736f6e222c22736368656d6156657273696f6e223a327d','sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc',1234,'application/vnd.oci.image.config.v1+json','["sha256:dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd"]','2026-11-29 12:00:00.250000','linux/amd64','application/vnd.oci.image.config.v1+json',NULL,NULL,NULL,'2026-11-30 12:00:00.250000');
CREATE TABLE deferred_blob_deletes (
	digest VARCHAR(71) NOT NULL, 
	defer_time DATETIME NOT NULL, 
	PRIMARY KEY (digest)
);
CREATE TABLE manifest_layers (
	manifest_id INTEGER NOT NULL, 
	position INTEGER NOT NULL, 
	digest VARCHAR(71) NOT NULL, 
	size_bytes BIGINT NOT NULL, 
	media_type VARCHAR(255) NOT NULL, 
	PRIMARY KEY (manifest_id, position), 
	FOREIGN KEY(manifest_id) REFERENCES manifests (id) ON DELETE CASCADE, 
	FOREIGN KEY(digest) REFERENCES blobs (digest)
);
INSERT INTO manifest_layers VALUES(1,0,'sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa',2097152,'application/vnd.oci.image.layer.v1.tar');
CREATE TABLE manifest_children (
	manifest_id INTEGER NOT NULL, 
	position INTEGER NOT NULL, 
	child_id INTEGER NOT NULL, 
	digest VARCHAR(71) NOT NULL, 
	size_bytes BIGINT NOT NULL, 
	media_type VARCHAR(255) NOT NULL, 
	platform VARCHAR(128), 
	artifact_type VARCHAR(255) NOT NULL, 
	PRIMARY KEY (manifest_id, position), 
	FOREIGN KEY(manifest_id) REFERENCES manifests (id) ON DELETE CASCADE, 
	FOREIGN KEY(child_id) REFERENCES manifests (id)
);
CREATE TABLE tags (
	repository VARCHAR(255) NOT NULL, 
	tag VARCHAR(128) NOT NULL, 
	manifest_id INTEGER NOT NULL, 
	update_time DATETIME NOT NULL, 
	PRIMARY KEY (repository, tag), 
	FOREIGN KEY(manifest_id) REFERENCES manifests (id)
);
INSERT INTO tags VALUES('app','1',1,'2026-12-01 18:25:52.265838');
INSERT INTO tags VALUES('app','latest',1,'2026-12-01 18:25:52.278898');
CREATE TABLE pulls (
	id VARCHAR(32) NOT NULL, 
	agent VARCHAR(64) NOT NULL, 
	image_name TEXT NOT NULL, 
	image TEXT NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	error TEXT NOT NULL, 
	cached_bytes BIGINT NOT NULL, 
	bittorrent_bytes BIGINT NOT NULL, 
	server_bytes BIGINT NOT NULL, 
	first_piece_bytes BIGINT NOT NULL, 
	fallback_bytes BIGINT NOT NULL, 
	create_time DATETIME NOT NULL, 
	start_time DATETIME, 
	end_time DATETIME, 
	PRIMARY KEY (id)
);
INSERT INTO pulls VALUES('p1','h1','app:1','{"repository": "app", "tag": "1", "digest": "sha256:4603ce06e5aafcc0157dc38c7cf5ecbfcb4bfaf2a705d0d021f0c18618624d20", "media_type": "application/vnd.oci.image.manifest.v1+json", "artifact_type": "", "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc", "size": 1234}, "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "size": 2097152}], "diff_ids": ["sha256:dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd"], "build_time": null, "create_time": "2026-11-30T12:00:00.250000+00:00", "platform": "linux/amd64", "manifests": []}','succeeded','',0,0,10,0,0,'2026-11-30 12:00:00.250000',NULL,NULL);
CREATE TABLE tokens (
	id VARCHAR(32) NOT NULL, 
	secret_hash VARCHAR(64) NOT NULL, 
	role VARCHAR(16) NOT NULL, 
	description TEXT NOT NULL, 
	create_time DATETIME NOT NULL, 
	expire_time DATETIME, 
	max_uses INTEGER NOT NULL, 
	uses INTEGER NOT NULL, 
	groups TEXT NOT NULL, 
	labels TEXT NOT NULL, 
	revoked BOOLEAN NOT NULL, 
	creator VARCHAR(64) NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO tokens VALUES('0123456789ab','ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff','agent','join web','2026-11-30 12:00:00.250000','2026-12-07 12:00:00.250000',20,1,'["web"]','[]',0,'admin');
CREATE TABLE agent_identities (
	name VARCHAR(64) NOT NULL, 
	key_hash VARCHAR(71) NOT NULL, 
	serials TEXT NOT NULL, 
	groups TEXT, 
	labels TEXT, 
	token_id VARCHAR(32) NOT NULL, 
	enroll_time DATETIME NOT NULL, 
	PRIMARY KEY (name)
);
INSERT INTO agent_identities VALUES('h1','sha256:eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee','["0a1b"]','["web"]',NULL,'0123456789ab','2026-11-30 12:00:00.250000');
CREATE TABLE audit_records (
	id INTEGER NOT NULL, 
	record_time DATETIME NOT NULL, 
	actor VARCHAR(128) NOT NULL, 
	action VARCHAR(255) NOT NULL, 
	target TEXT NOT NULL, 
	outcome TEXT NOT NULL, 
	peer VARCHAR(255) NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO audit_records VALUES(1,'2026-11-30 12:00:00.250000','admin','/docket.v1.RolloutService/CreateRollout','app:1','ok','127.0.0.1');
CREATE INDEX ix_rollouts_state ON rollouts (state);
CREATE INDEX ix_rollouts_create_time ON rollouts (create_time);
CREATE INDEX ix_rollout_tasks_rollout_id ON rollout_tasks (rollout_id);
CREATE INDEX ix_rollout_records_rollout_id ON rollout_records (rollout_id);
CREATE INDEX ix_manifests_config ON manifests (config_digest);
CREATE INDEX ix_manifests_subject ON manifests (repository, subject_digest);
CREATE INDEX ix_manifest_layers_digest ON manifest_layers (digest);
CREATE INDEX ix_manifest_children_child_id ON manifest_children (child_id);
CREATE INDEX ix_tags_manifest_id ON tags (manifest_id);
CREATE INDEX ix_pulls_agent ON pulls (agent);
CREATE INDEX ix_pulls_state ON pulls (state);
CREATE INDEX ix_pulls_create_time ON pulls (create_time);
CREATE INDEX ix_audit_records_record_time ON audit_records (record_time);
COMMIT;
