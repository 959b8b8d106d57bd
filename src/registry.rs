//! The set of installed stage plugins, looked up by `uses:` name, and the model loader that
//! `finetune predict` uses.

use std::collections::BTreeMap;

use finetune_core::{Predictor, Stage};

#[derive(Default)]
pub struct Registry {
    stages: BTreeMap<&'static str, Box<dyn Stage>>,
    predictor: Option<Box<dyn Predictor>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a plugin. Two plugins with one name is a programming error.
    pub fn with(mut self, stage: impl Stage + 'static) -> Self {
        let name = stage.name();
        let previous = self.stages.insert(name, Box::new(stage));
        assert!(previous.is_none(), "two stage plugins are named `{name}`");
        self
    }

    /// Sets what loads models for `finetune predict`.
    pub fn with_predictor(mut self, predictor: impl Predictor + 'static) -> Self {
        self.predictor = Some(Box::new(predictor));
        self
    }

    pub fn predictor(&self) -> Option<&dyn Predictor> {
        self.predictor.as_deref()
    }

    pub fn get(&self, name: &str) -> Option<&dyn Stage> {
        self.stages.get(name).map(|s| s.as_ref())
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.stages.keys().copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = &dyn Stage> {
        self.stages.values().map(|s| s.as_ref())
    }
}
