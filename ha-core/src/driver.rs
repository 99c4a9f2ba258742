//! The tokio driver: runs the engine over a transport, a log store and a state
//! machine. (Filled in by the driver work.)
