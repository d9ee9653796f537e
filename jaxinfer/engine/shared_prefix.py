"""Groups the sequences of a step by the prefix pages they share (no jax).

Path: scheduler -> **shared_prefix** (SharedPrefix nodes in the StepInput) -> runner
-> shared-prefix attention (jaxinfer.pallas.prefix_attention).

The block manager's prefix cache already makes sequences with a common prompt prefix
hold the *same physical pages*, so sharing is read off the page lists: two scheduled
sequences share page i when both lists hold the same page id at index i (the hash
chain pins a cached page to one index). Only pages entirely before a sequence's first
query this step count (they were computed in an earlier step and no query of the
sequence is inside them).

The nodes form a tree. Starting from all sequences at page 0, sequences are split by
the page they hold at the current index; a group of at least `min_seqs` sequences is
extended page by page while all its members agree, which gives one node
[depth, end); its members are then split again at `end` (children: a subset sharing
more, such as few-shot examples under a common system prompt).

Cost rule. A node is used when it has at least `min_seqs` members and at least
`min_tokens` tokens: below that, the extra prefix rows and the merge cost more than
the re-reads they save. A rejected node's subtree is not used either, so each
sequence's nodes cover its positions from 0 without a gap and its own attention
starts at one position (its deepest node's end).
"""
from __future__ import annotations

from typing import Sequence

from jaxinfer.types import ScheduledSequence, SharedPrefix


def find_shared_prefixes(sequences: Sequence[ScheduledSequence], page_size: int, *, min_tokens: int,
                         min_seqs: int) -> tuple:
    """The tree of shared prefix pages of a step, as SharedPrefix nodes (parents first).

    Args:
      sequences: the step's sequences, in batch order.
      page_size: tokens per page (L).
      min_tokens: smallest node (in tokens) worth the shared path.
      min_seqs: fewest sequences sharing a node (>= 2).
    Returns:
      tuple of SharedPrefix; () when no node passes the cost rule.
    """
    eligible = [tuple(s.page_ids[:s.start_position // page_size]) for s in sequences]
    nodes: list = []

    def visit(members: Sequence[int], depth: int) -> None:
        by_page: dict = {}
        for i in members:
            if len(eligible[i]) > depth:
                by_page.setdefault(eligible[i][depth], []).append(i)
        for group in by_page.values():
            if len(group) < min_seqs:
                continue
            end = depth + 1
            while all(len(eligible[i]) > end and eligible[i][end] == eligible[group[0]][end] for i in group):
                end += 1
            if (end - depth) * page_size < min_tokens:
                continue
            nodes.append(SharedPrefix(start_page=depth, page_ids=eligible[group[0]][depth:end],
                                      members=tuple(group)))
            visit(group, end)

    visit(range(len(sequences)), 0)
    return tuple(nodes)
