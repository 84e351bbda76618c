"""The ground: files, locks, strict JSON, regexes, signals, progress, ranks, limits and statistics; imports nothing
of cbtool but `errors`."""
