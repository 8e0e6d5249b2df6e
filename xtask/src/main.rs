//! xtask (skeleton; see ARCHITECTURE.md).
fn main() {
    println!("xtask: not implemented yet");
}
