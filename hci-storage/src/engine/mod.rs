//! The replicated engine.
