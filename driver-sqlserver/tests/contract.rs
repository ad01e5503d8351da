//! The shared driver contract suite against SQL Server. Where the server
//! comes from (`SHARDLOCK_MSSQL_URL`, a local `SHARDLOCK_MSSQL_IMAGE`, or a
//! loud skip) is described in `common/mod.rs`.

mod common;

shardlock_contract_tests::driver_contract_tests!(common::harness().await);
