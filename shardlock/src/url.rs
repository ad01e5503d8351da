//! Choosing a driver from a URL, like sqlx's `AnyConnectOptions`.

use shardlock_core::{Error, ErrorKind, Result};

use crate::AnyDriver;

/// Why a URL names no driver this build can use.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// The text has no `scheme:` prefix.
    #[error("{url:?} is not a URL: expected e.g. postgres://, mysql://, sqlserver://, sqlite://, memory:")]
    NoScheme {
        /// The rejected text, with any password removed.
        url: String,
    },
    /// No driver handles the scheme.
    #[error("unknown scheme {scheme:?}: expected postgres, postgresql, mysql, mariadb, sqlserver, mssql, sqlite or memory")]
    UnknownScheme {
        /// The scheme.
        scheme: String,
    },
    /// The driver for the scheme was not compiled in.
    #[error("the {feature} driver is not enabled: build shardlock with feature \"{feature}\"")]
    FeatureDisabled {
        /// The cargo feature to enable.
        feature: &'static str,
    },
}

impl UrlError {
    fn into_error(self) -> Error {
        Error::Driver {
            driver: "any",
            kind: ErrorKind::Config,
            source: Box::new(self),
        }
    }
}

/// Hides a password (`user:secret@` → `user:***@`) before a URL is printed.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(start), Some(at)) if at > start => {
            let auth = &url[start + 3..at];
            match auth.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..start + 3], &auth[..colon], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl AnyDriver {
    /// The driver a URL names, by its scheme:
    ///
    /// | scheme | driver | feature |
    /// |---|---|---|
    /// | `postgres://`, `postgresql://` | [`PgDriver`](crate::postgres::PgDriver) from [`PgOptions`](crate::postgres::PgOptions) | `postgres` |
    /// | `mysql://`, `mariadb://` | [`MySqlDriver`](crate::mysql::MySqlDriver) from [`MySqlOptions`](crate::mysql::MySqlOptions) | `mysql` |
    /// | `sqlserver://`, `mssql://` | [`MssqlDriver`](crate::sqlserver::MssqlDriver) from [`MssqlOptions`](crate::sqlserver::MssqlOptions) | `sqlserver` |
    /// | `sqlite://<dir>`, `sqlite:<dir>` | [`SqliteDriver`](crate::sqlite::SqliteDriver) on that lock directory | `sqlite` |
    /// | `memory:` | a fresh in-process [`MemoryServer`](crate::memory::MemoryServer) | `memory` |
    ///
    /// ```
    /// # #[cfg(feature = "memory")] {
    /// use shardlock::{AnyDriver, Driver};
    ///
    /// let driver = AnyDriver::from_url("memory:")?;
    /// assert_eq!(driver.name(), "memory");
    /// assert!(AnyDriver::from_url("redis://localhost").is_err());
    /// # }
    /// # Ok::<(), shardlock::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// An [`Error::Driver`] of kind [`ErrorKind::Config`] whose source is a
    /// [`UrlError`] (no scheme, unknown scheme, driver not compiled in) or
    /// the driver's own URL error.
    pub fn from_url(url: &str) -> Result<Self> {
        let Some((scheme, rest)) = url.split_once(':') else {
            return Err(UrlError::NoScheme { url: redact(url) }.into_error());
        };
        match scheme.to_ascii_lowercase().as_str() {
            "postgres" | "postgresql" => postgres(url),
            "mysql" | "mariadb" => mysql(url),
            "sqlserver" | "mssql" => sqlserver(url),
            "sqlite" => sqlite(rest.strip_prefix("//").unwrap_or(rest)),
            "memory" => memory(),
            other => Err(UrlError::UnknownScheme {
                scheme: other.to_string(),
            }
            .into_error()),
        }
    }
}

fn config_error(
    driver: &'static str,
    source: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::Driver {
        driver,
        kind: ErrorKind::Config,
        source: Box::new(source),
    }
}

#[cfg(feature = "postgres")]
fn postgres(url: &str) -> Result<AnyDriver> {
    let options =
        shardlock_postgres::PgOptions::parse(url).map_err(|e| config_error("postgres", e))?;
    Ok(AnyDriver::Postgres(shardlock_postgres::PgDriver::new(
        options,
    )))
}

#[cfg(not(feature = "postgres"))]
fn postgres(_url: &str) -> Result<AnyDriver> {
    Err(UrlError::FeatureDisabled {
        feature: "postgres",
    }
    .into_error())
}

#[cfg(feature = "mysql")]
fn mysql(url: &str) -> Result<AnyDriver> {
    let options =
        shardlock_mysql::MySqlOptions::parse(url).map_err(|e| config_error("mysql", e))?;
    Ok(AnyDriver::MySql(shardlock_mysql::MySqlDriver::new(options)))
}

#[cfg(not(feature = "mysql"))]
fn mysql(_url: &str) -> Result<AnyDriver> {
    Err(UrlError::FeatureDisabled { feature: "mysql" }.into_error())
}

#[cfg(feature = "sqlserver")]
fn sqlserver(url: &str) -> Result<AnyDriver> {
    let options =
        shardlock_sqlserver::MssqlOptions::parse(url).map_err(|e| config_error("sqlserver", e))?;
    Ok(AnyDriver::SqlServer(shardlock_sqlserver::MssqlDriver::new(
        options,
    )))
}

#[cfg(not(feature = "sqlserver"))]
fn sqlserver(_url: &str) -> Result<AnyDriver> {
    Err(UrlError::FeatureDisabled {
        feature: "sqlserver",
    }
    .into_error())
}

#[cfg(feature = "sqlite")]
fn sqlite(dir: &str) -> Result<AnyDriver> {
    let driver =
        shardlock_sqlite::SqliteDriver::open(dir).map_err(|e| config_error("sqlite", e))?;
    Ok(AnyDriver::Sqlite(driver))
}

#[cfg(not(feature = "sqlite"))]
fn sqlite(_dir: &str) -> Result<AnyDriver> {
    Err(UrlError::FeatureDisabled { feature: "sqlite" }.into_error())
}

#[cfg(feature = "memory")]
fn memory() -> Result<AnyDriver> {
    Ok(AnyDriver::Memory(
        shardlock_memory::MemoryServer::new().driver(),
    ))
}

#[cfg(not(feature = "memory"))]
fn memory() -> Result<AnyDriver> {
    Err(UrlError::FeatureDisabled { feature: "memory" }.into_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://app:s3cret@db/app"),
            "postgres://app:***@db/app"
        );
        assert_eq!(redact("postgres://db/app"), "postgres://db/app");
    }

    #[cfg(feature = "mysql")]
    #[test]
    fn mysql_and_mariadb_urls() {
        use shardlock_core::Driver;
        for url in ["mysql://app:pw@db:3306/app", "mariadb://app:pw@db/app"] {
            let driver = AnyDriver::from_url(url).expect(url);
            assert_eq!(driver.name(), "mysql");
        }
    }

    #[test]
    fn bad_urls_are_typed_config_errors() {
        for url in ["", "no scheme here", "redis://localhost", "ftp:/x"] {
            let err = AnyDriver::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{url}: {err}");
            assert!(!err.report().contains("s3cret"));
        }
        let err = AnyDriver::from_url("postgres://app:s3cret@").err();
        if let Some(err) = err {
            assert!(!err.report().contains("s3cret"), "{}", err.report());
        }
    }
}
