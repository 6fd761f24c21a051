"""Progress bars: the terminal's, and the steps a watcher (the server's swap) sees."""

from __future__ import annotations

import asyncio

from ramserve.progress import Bar, Step, watching


def test_progress_reaches_the_watcher_of_the_work_that_started_it() -> None:
    def work(total: int) -> None:
        bar = Bar(total, "writing", unit="B", show=False)
        for _ in range(total):
            bar.update(1)
        bar.close()

    async def main() -> list[Step]:
        seen: list[Step] = []
        with watching(seen.append):  # the worker thread inherits it
            await asyncio.to_thread(work, 4)
        await asyncio.to_thread(work, 2)  # started outside: not reported
        return seen

    seen = asyncio.run(main())
    assert [s.done for s in seen] == [0, 1, 2, 3, 4] and seen[-1].fraction == 1.0
    assert all(s.desc == "writing" and s.total == 4 for s in seen)
