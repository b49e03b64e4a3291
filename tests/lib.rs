//! The end-to-end suite lives in the test targets beside this file; see `support/`.
