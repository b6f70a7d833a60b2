//! Data on disk: prompt sets and tensor files.

pub mod prompts;
pub mod tensorfile;
