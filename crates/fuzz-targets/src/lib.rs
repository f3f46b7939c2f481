//! Fuzz targets of iam-broker, as plain functions over bytes.
#![forbid(unsafe_code)]
