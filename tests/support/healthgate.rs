//! (filled in by the healthgate work)
