//! `ha-wal`: the durable write-ahead log, the WAL streamer (primary side) and the applier (standby side). The durable log lands with its own issue; this crate is empty until then.
