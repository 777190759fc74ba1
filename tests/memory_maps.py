"""What /proc/self/smaps says of the memory mapping that holds an address: for the tests of memory-mapped loading,
huge pages and saved quantized models."""

from pathlib import Path


def mapping_of(address: int) -> dict:
    """The /proc/self/smaps entry of the mapping that holds `address`: its range, the file it maps ("path": "" for
    anonymous memory, "[heap]" for the heap), its fields as text (Rss, THPeligible, ...) and VmFlags as a list."""
    entry = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: range, perms, offset, dev, inode[, path]
            begin, end = (int(a, 16) for a in head.split("-"))
            fields = line.split(maxsplit=5)
            entry = None if not begin <= address < end else {
                "range": (begin, end), "path": fields[5] if len(fields) == 6 else ""}
        elif entry is not None:
            entry[head.rstrip(":")] = line.split()[1]
            if head == "VmFlags:":
                entry["VmFlags"] = line.split()[1:]
                return entry
    raise AssertionError(f"no mapping holds {address:#x}")
