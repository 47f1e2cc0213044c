//! hearth-kernel
