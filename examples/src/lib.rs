//! Runnable examples of the hci SDK live next to this crate as `examples/*.rs`;
//! run one with `cargo run --release -p hci-examples --example NAME`.
