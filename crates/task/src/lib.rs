//! What a classifier head predicts, under the names Hugging Face's `config.json` gives it
//! (`problem_type`). Ingest declares it, labels.json carries it from stage to stage, the model
//! saves it in config.json and the trainer picks its loss by it; this crate is the one word for
//! it that all of them share, with nothing of pipelines or models in it.

use serde::{Deserialize, Serialize};

/// A head's task: what its outputs mean, and so the loss it trains with.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ProblemType {
    /// One label per text: a softmax over the labels, cross-entropy.
    #[default]
    SingleLabelClassification,
    /// Any number of labels per text: one sigmoid per label, binary cross-entropy.
    MultiLabelClassification,
    /// One or several real numbers per text: the outputs as they are, squared error.
    Regression,
}

impl ProblemType {
    pub const ALL: [ProblemType; 3] = [
        ProblemType::SingleLabelClassification,
        ProblemType::MultiLabelClassification,
        ProblemType::Regression,
    ];

    /// The name in config.json and pipelines.
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemType::SingleLabelClassification => "single_label_classification",
            ProblemType::MultiLabelClassification => "multi_label_classification",
            ProblemType::Regression => "regression",
        }
    }

    /// The task a name gives, or `None` for a name that is none of them.
    pub fn from_name(name: &str) -> Option<ProblemType> {
        ProblemType::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// Whether the outputs are labels (classification) rather than numbers.
    pub fn is_classification(self) -> bool {
        self != ProblemType::Regression
    }
}

impl std::fmt::Display for ProblemType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::ProblemType;

    #[test]
    fn names_round_trip_and_unknown_names_are_none() {
        for problem in ProblemType::ALL {
            assert_eq!(ProblemType::from_name(problem.as_str()), Some(problem));
        }
        assert_eq!(ProblemType::from_name("classification"), None);
    }
}
