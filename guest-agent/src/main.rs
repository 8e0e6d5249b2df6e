//! guest-agent (skeleton; see ARCHITECTURE.md).
fn main() {
    println!("guest-agent: not implemented yet");
}
