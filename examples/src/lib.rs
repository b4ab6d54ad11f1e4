//! examples support
