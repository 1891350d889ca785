//! (filled in by the mariadb work)
