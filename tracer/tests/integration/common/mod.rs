//! Shared helpers of the integration suites, one module a concern: privileges (and
//! `require_privileges!`), fixture builds, child processes with timeouts, the `alloctrace record`
//! handshake, the JSON report, the fixtures' known answers and the bad-input contract.

#[macro_use]
mod privileges;

mod answers;
mod errors;
mod fixtures;
mod process;
mod recording;
mod report;

pub use answers::*;
pub use errors::*;
pub use fixtures::*;
pub use privileges::*;
pub use process::*;
pub use recording::*;
pub use report::*;
