//! measurements (skeleton; see ARCHITECTURE.md).
