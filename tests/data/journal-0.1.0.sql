-- A journal as qmp-reactor 0.1.0 (journal schema 1) left it: written by that version's
-- Journal class, then dumped with sqlite3's iterdump. tests/test_upgrade.py loads it with
-- @@PORT@@ replaced by its receiver's port. Do not regenerate it: it stands for the past.
BEGIN TRANSACTION;
CREATE TABLE dead_letters (id TEXT PRIMARY KEY NOT NULL,  -- uuid4 hex; also the idempotency key 
    firing_id TEXT NOT NULL,     -- the invocations of one firing run in action_index order
    rule TEXT NOT NULL,
    action_index INTEGER NOT NULL,
    action_type TEXT NOT NULL,
    params TEXT NOT NULL,        -- JSON: the raw `with` mapping, templates unrendered
    retry TEXT NOT NULL,         -- JSON: the effective RetryPolicy
    timeout REAL NOT NULL,       -- seconds per attempt
    mode TEXT NOT NULL,          -- the rule's mode when it fired
    vm TEXT NOT NULL,
    event TEXT NOT NULL,
    seq INTEGER,
    envelope TEXT NOT NULL,      -- JSON
    context TEXT NOT NULL,       -- JSON
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,   -- attempts started
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    last_error TEXT              -- redacted by the dispatcher's redactor
, died_at REAL NOT NULL);
INSERT INTO "dead_letters" VALUES('d0000000000040008000000000000005','d0000000000040008000000000000005','stopped',0,'webhook','{"url":"http://127.0.0.1:@@PORT@@/hook","body":{"n":40,"vm":"{{ vm }}"}}','{"attempts":6,"initial":0.05,"max":0.2,"multiplier":2.0,"jitter":0.01}',5.0,'queued','vm1','STOP',4,'{"event":"STOP","data":{},"timestamp":{"seconds":1763000004,"microseconds":0},"vm":"vm1","host":"hv1","source":"/run/qemu/vm1.qmp","seq":4,"received_at":1763000004.0}','{"count":1}','dead',6,1763000004.0,1763000004.0,NULL,'webhook POST http://127.0.0.1:@@PORT@@/hook: HTTP 503',1.79524218132026410106e+09);
CREATE TABLE invocations (n INTEGER PRIMARY KEY, id TEXT  NOT NULL,  -- uuid4 hex; also the idempotency key 
    firing_id TEXT NOT NULL,     -- the invocations of one firing run in action_index order
    rule TEXT NOT NULL,
    action_index INTEGER NOT NULL,
    action_type TEXT NOT NULL,
    params TEXT NOT NULL,        -- JSON: the raw `with` mapping, templates unrendered
    retry TEXT NOT NULL,         -- JSON: the effective RetryPolicy
    timeout REAL NOT NULL,       -- seconds per attempt
    mode TEXT NOT NULL,          -- the rule's mode when it fired
    vm TEXT NOT NULL,
    event TEXT NOT NULL,
    seq INTEGER,
    envelope TEXT NOT NULL,      -- JSON
    context TEXT NOT NULL,       -- JSON
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,   -- attempts started
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    last_error TEXT              -- redacted by the dispatcher's redactor
);
INSERT INTO "invocations" VALUES(1,'a0000000000040008000000000000001','a0000000000040008000000000000001','stopped',0,'webhook','{"url":"http://127.0.0.1:@@PORT@@/hook","body":{"n":10,"vm":"{{ vm }}"}}','{"attempts":6,"initial":0.05,"max":0.2,"multiplier":2.0,"jitter":0.01}',5.0,'queued','vm1','STOP',1,'{"event":"STOP","data":{},"timestamp":{"seconds":1763000001,"microseconds":0},"vm":"vm1","host":"hv1","source":"/run/qemu/vm1.qmp","seq":1,"received_at":1763000001.0}','{"count":1}','pending',0,1763000001.0,1763000001.0,NULL,NULL);
INSERT INTO "invocations" VALUES(2,'b0000000000040008000000000000002','b0000000000040008000000000000002','stopped',0,'webhook','{"url":"http://127.0.0.1:@@PORT@@/hook","body":{"n":20,"vm":"{{ vm }}"}}','{"attempts":6,"initial":0.05,"max":0.2,"multiplier":2.0,"jitter":0.01}',5.0,'queued','vm1','STOP',2,'{"event":"STOP","data":{},"timestamp":{"seconds":1763000002,"microseconds":0},"vm":"vm1","host":"hv1","source":"/run/qemu/vm1.qmp","seq":2,"received_at":1763000002.0}','{"count":1}','running',2,1763000002.0,1763000002.0,NULL,'webhook POST http://127.0.0.1:@@PORT@@/hook: HTTP 503');
INSERT INTO "invocations" VALUES(3,'c0000000000040008000000000000003','c0000000000040008000000000000003','stopped',0,'webhook','{"url":"http://127.0.0.1:@@PORT@@/hook","body":{"n":30,"vm":"{{ vm }}"}}','{"attempts":6,"initial":0.05,"max":0.2,"multiplier":2.0,"jitter":0.01}',5.0,'queued','vm1','STOP',3,'{"event":"STOP","data":{},"timestamp":{"seconds":1763000003,"microseconds":0},"vm":"vm1","host":"hv1","source":"/run/qemu/vm1.qmp","seq":3,"received_at":1763000003.0}','{"count":1}','done',1,1763000003.0,1763000003.0,1763000003.5,NULL);
INSERT INTO "invocations" VALUES(4,'c1000000000040008000000000000004','c0000000000040008000000000000003','stopped',1,'webhook','{"url":"http://127.0.0.1:@@PORT@@/hook","body":{"n":31,"vm":"{{ vm }}"}}','{"attempts":6,"initial":0.05,"max":0.2,"multiplier":2.0,"jitter":0.01}',5.0,'queued','vm1','STOP',3,'{"event":"STOP","data":{},"timestamp":{"seconds":1763000003,"microseconds":0},"vm":"vm1","host":"hv1","source":"/run/qemu/vm1.qmp","seq":3,"received_at":1763000003.0}','{"count":1}','pending',0,1763000003.0,1763000003.0,NULL,NULL);
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO "schema_version" VALUES(1);
CREATE INDEX invocations_requeued ON invocations(status) WHERE status = 'requeued';
CREATE INDEX invocations_finished ON invocations(finished_at) WHERE finished_at IS NOT NULL;
COMMIT;
