//! One module per `clipcid` subcommand: its options (the struct the command line parses)
//! and the function that runs it and returns what it did.

pub mod balance;
pub mod cluster;
pub mod distill;
pub mod embed;
pub mod evaluate;
pub mod teacher;
