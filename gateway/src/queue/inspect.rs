//! Read-only view of a queue directory (for tools). TODO
