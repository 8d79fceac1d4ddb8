"""Where the rows of a global batch live: which process holds which rows, and which groups those rows belong to.

A micro-step's global batch is `num_processes × rows_per_process` rows, laid out in groups of `num_generations`
consecutive rows (`RepeatSampler`); accelerate hands process p the rows [p·b, (p+1)·b). A group may span two
processes. Everything that must not depend on the process count (noise seeds, advantages, the data term's weights)
is defined on global row and group indices from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class GroupLayout:
    """The rows of one process within the global micro-batch.

    Attributes:
        rows_per_process: b, this process's batch size (the same on every process).
        num_generations: N, rows per group.
        process_index: p.
        num_processes: world size.
    """

    rows_per_process: int
    num_generations: int
    process_index: int = 0
    num_processes: int = 1

    def __post_init__(self):
        if self.rows_per_process * self.num_processes % self.num_generations:
            raise ValueError(
                f"The global batch ({self.num_processes} processes × {self.rows_per_process} rows) is not a multiple "
                f"of num_generations ({self.num_generations}): make per_device_train_batch_size × number of processes "
                f"a multiple of num_generations."
            )

    @property
    def first_row(self) -> int:
        """Global index of this process's first row."""
        return self.process_index * self.rows_per_process

    @property
    def global_rows(self) -> range:
        return range(self.first_row, self.first_row + self.rows_per_process)

    @property
    def local_slice(self) -> slice:
        """This process's rows within the gathered global batch."""
        return slice(self.first_row, self.first_row + self.rows_per_process)

    @cached_property
    def groups(self) -> list[int]:
        """Global indices of the groups this process holds rows of, in order."""
        n = self.num_generations
        return list(range(self.first_row // n, (self.first_row + self.rows_per_process - 1) // n + 1))

    @cached_property
    def counts(self) -> list[int]:
        """How many of each group's rows this process holds (N for whole groups; fewer where a group spans)."""
        n, start, stop = self.num_generations, self.first_row, self.first_row + self.rows_per_process
        return [min(stop, (g + 1) * n) - max(start, g * n) for g in self.groups]

    @cached_property
    def first_local_rows(self) -> list[int]:
        """Local index of each group's first row on this process."""
        starts, position = [], 0
        for count in self.counts:
            starts.append(position)
            position += count
        return starts

    @property
    def data_weights(self) -> list[float]:
        """Weight of each local group's data loss: the share of this process's rows in that group, scaled so the mean
        over processes (DDP averages gradients) is the plain mean over all groups. Σ_p (c_gp / b) · (1/P) = 1/G."""
        groups_here = len(self.groups)
        return [groups_here * count / self.rows_per_process for count in self.counts]
