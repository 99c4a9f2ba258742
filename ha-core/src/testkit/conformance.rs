//! Conformance suites for `LogStore` and `Transport` implementations.
