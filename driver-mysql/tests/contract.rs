//! The shared driver contract suite against MySQL/MariaDB (see `common` for
//! which server is used).

mod common;

use common::harness;

shardlock_contract_tests::driver_contract_tests!(harness().await);
