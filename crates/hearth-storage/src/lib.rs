//! hearth-storage
