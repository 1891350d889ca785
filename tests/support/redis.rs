//! (filled in by the redis work)
