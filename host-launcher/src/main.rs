//! host-launcher (skeleton; see ARCHITECTURE.md).
fn main() {
    println!("host-launcher: not implemented yet");
}
