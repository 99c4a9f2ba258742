//! In-memory `LogStore`, `StateMachine` and `Transport`.
