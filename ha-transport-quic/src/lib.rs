//! `ha-transport-quic`: the replication and Raft RPCs over mutually authenticated QUIC (quinn + rustls). Lands with its own issue; this crate is empty until then.
