//! hearth-api
