//! Readers of the target's `/proc` files. Everything read here comes from the target and is
//! untrusted: parsers skip what they cannot read rather than fail.
pub mod maps;
