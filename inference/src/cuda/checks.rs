//! GPU-vs-CPU checks (filled below).
