//! VM-booting end-to-end tests.
