//! inference (skeleton; see ARCHITECTURE.md).
