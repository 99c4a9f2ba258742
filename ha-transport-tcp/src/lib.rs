//! `ha-transport-tcp`: the same transport contract over TCP + TLS, for deployments without UDP. Lands with its own issue; this crate is empty until then.
