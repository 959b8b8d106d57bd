//! The stage graph: validation of `needs`, cycle reports, topological order, target selection,
//! and drawings in text, Graphviz dot and Mermaid.

use std::collections::BTreeSet;

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, Reversed};

use crate::pipeline::{Pipeline, PipelineError};

/// Stages are referred to by their index in `Pipeline::stages`.
pub struct Dag {
    graph: DiGraph<usize, ()>,
    /// Stage indices, every stage after all that it needs; ties in file order.
    order: Vec<usize>,
}

impl Dag {
    pub fn build(pipeline: &Pipeline) -> Result<Dag, PipelineError> {
        let mut graph = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..pipeline.stages.len())
            .map(|i| graph.add_node(i))
            .collect();
        for (index, stage) in pipeline.stages.iter().enumerate() {
            for (n, need) in stage.needs.iter().enumerate() {
                let Some(upstream) = pipeline.stages.iter().position(|s| &s.id == need) else {
                    let known: Vec<&str> = pipeline.stages.iter().map(|s| s.id.as_str()).collect();
                    return Err(pipeline.error_at(
                        stage,
                        &format!("needs[{n}]"),
                        format!(
                            "unknown stage `{need}`; the stages are: {}",
                            known.join(", ")
                        ),
                    ));
                };
                if upstream == index {
                    return Err(pipeline.error_at(
                        stage,
                        &format!("needs[{n}]"),
                        "a stage cannot need itself",
                    ));
                }
                graph.add_edge(nodes[upstream], nodes[index], ());
            }
        }
        if toposort(&graph, None).is_err() {
            return Err(cycle_error(pipeline, &graph));
        }
        let order = stable_order(&graph);
        Ok(Dag { graph, order })
    }

    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// `targets` and everything they transitively need.
    pub fn with_ancestors(&self, targets: &[usize]) -> BTreeSet<usize> {
        self.reach(targets, true)
    }

    /// `roots` and everything that transitively needs them.
    pub fn with_descendants(&self, roots: &[usize]) -> BTreeSet<usize> {
        self.reach(roots, false)
    }

    fn reach(&self, starts: &[usize], upwards: bool) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        for &start in starts {
            let node = NodeIndex::new(start);
            if upwards {
                let reversed = Reversed(&self.graph);
                let mut dfs = Dfs::new(reversed, node);
                while let Some(n) = dfs.next(reversed) {
                    seen.insert(n.index());
                }
            } else {
                let mut dfs = Dfs::new(&self.graph, node);
                while let Some(n) = dfs.next(&self.graph) {
                    seen.insert(n.index());
                }
            }
        }
        seen
    }

    /// The drawing `finetune dag` prints.
    pub fn render(&self, pipeline: &Pipeline, format: DagFormat) -> String {
        let mut out = String::new();
        let stages = &pipeline.stages;
        match format {
            DagFormat::Text => {
                for &i in &self.order {
                    let s = &stages[i];
                    if s.needs.is_empty() {
                        out.push_str(&format!("{} ({})\n", s.id, s.uses));
                    } else {
                        out.push_str(&format!(
                            "{} ({}) <- {}\n",
                            s.id,
                            s.uses,
                            s.needs.join(", ")
                        ));
                    }
                }
            }
            DagFormat::Dot => {
                out.push_str(&format!(
                    "digraph \"{}\" {{\n  rankdir=LR;\n",
                    pipeline.name
                ));
                for &i in &self.order {
                    out.push_str(&format!(
                        "  \"{0}\" [label=\"{0}\\n({1})\"];\n",
                        stages[i].id, stages[i].uses
                    ));
                }
                for &i in &self.order {
                    for need in &stages[i].needs {
                        out.push_str(&format!("  \"{need}\" -> \"{}\";\n", stages[i].id));
                    }
                }
                out.push_str("}\n");
            }
            DagFormat::Mermaid => {
                out.push_str("flowchart LR\n");
                for &i in &self.order {
                    out.push_str(&format!(
                        "  {0}[\"{0} ({1})\"]\n",
                        stages[i].id, stages[i].uses
                    ));
                }
                for &i in &self.order {
                    for need in &stages[i].needs {
                        out.push_str(&format!("  {need} --> {}\n", stages[i].id));
                    }
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DagFormat {
    Text,
    Dot,
    Mermaid,
}

/// Kahn's algorithm taking the lowest file index first, so the order is the file's order
/// wherever the dependencies allow it (petgraph's toposort makes no such promise).
fn stable_order(graph: &DiGraph<usize, ()>) -> Vec<usize> {
    let mut indegree: Vec<usize> = graph
        .node_indices()
        .map(|n| graph.neighbors_directed(n, petgraph::Incoming).count())
        .collect();
    let mut ready: BTreeSet<usize> = (0..indegree.len()).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(indegree.len());
    while let Some(next) = ready.pop_first() {
        order.push(next);
        for succ in graph.neighbors(NodeIndex::new(next)) {
            indegree[succ.index()] -= 1;
            if indegree[succ.index()] == 0 {
                ready.insert(succ.index());
            }
        }
    }
    order
}

/// Names the stages of one cycle in order, e.g. "a -> b -> c -> a".
fn cycle_error(pipeline: &Pipeline, graph: &DiGraph<usize, ()>) -> PipelineError {
    let component = tarjan_scc(graph)
        .into_iter()
        .filter(|c| c.len() > 1)
        .min_by_key(|c| c.iter().map(|n| n.index()).min())
        .unwrap_or_default();
    let members: BTreeSet<usize> = component.iter().map(|n| n.index()).collect();
    let start = *members.first().unwrap_or(&0);
    // Walk inside the component until we come back to a stage already on the path.
    let mut path = vec![start];
    loop {
        let current = *path.last().unwrap_or(&start);
        let next = graph
            .neighbors(NodeIndex::new(current))
            .map(|n| n.index())
            .filter(|n| members.contains(n))
            .min()
            .unwrap_or(start);
        if let Some(at) = path.iter().position(|&p| p == next) {
            path.drain(..at);
            path.push(next);
            break;
        }
        path.push(next);
    }
    let names: Vec<&str> = path
        .iter()
        .map(|&i| pipeline.stages[i].id.as_str())
        .collect();
    let first = &pipeline.stages[path[0]];
    pipeline.error_at(
        first,
        "needs",
        format!("the stages form a cycle: {}", names.join(" -> ")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn pipeline(source: &str) -> Pipeline {
        Pipeline::parse(Path::new("p.yaml"), source, &|_| None).unwrap()
    }

    #[test]
    fn orders_and_selects() {
        let p = pipeline(
            "name: x\nstages:\n  c: {uses: u, needs: [b]}\n  a: {uses: u}\n  b: {uses: u, needs: [a]}\n  d: {uses: u, needs: [a]}\n",
        );
        let dag = Dag::build(&p).unwrap();
        let ids: Vec<&str> = dag
            .order()
            .iter()
            .map(|&i| p.stages[i].id.as_str())
            .collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        assert_eq!(dag.with_ancestors(&[0]), BTreeSet::from([0, 1, 2]));
        assert_eq!(dag.with_descendants(&[2]), BTreeSet::from([0, 2]));
        assert_eq!(dag.with_descendants(&[1]), BTreeSet::from([0, 1, 2, 3]));
    }

    #[test]
    fn cycles_are_listed() {
        let p = pipeline(
            "name: x\nstages:\n  a: {uses: u, needs: [c]}\n  b: {uses: u, needs: [a]}\n  c: {uses: u, needs: [b]}\n  d: {uses: u}\n",
        );
        let err = Dag::build(&p).err().unwrap();
        assert!(
            err.message.contains("cycle: a -> b -> c -> a"),
            "{}",
            err.message
        );
        assert_eq!(err.mark.line, 3);
    }

    #[test]
    fn unknown_needs_name_the_line() {
        let p =
            pipeline("name: x\nstages:\n  a: {uses: u}\n  b:\n    uses: u\n    needs: [a, nope]\n");
        let err = Dag::build(&p).err().unwrap();
        assert_eq!((err.mark.line, err.key.as_deref()), (6, Some("needs[1]")));
        assert!(err.message.contains("unknown stage `nope`"));
    }
}
