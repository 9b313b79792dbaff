"""Timestep respacing: which of the T original steps a sampler keeps ("250", "10,15,20", "ddim25")."""


def parse_respacing(spec: str) -> str:
    """Normalise a sampling spec: 25 -> "25", " ddim25 " -> "ddim25"; raises ValueError on junk."""
    s = str(spec).strip()
    if s.startswith("ddim"):
        body = s[4:]
        if not body.isdigit() or int(body) < 1:
            raise ValueError(f"bad sampling spec {spec!r}: expected 'ddimN' with N >= 1")
        return s
    parts = s.split(",")
    if not s or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"bad sampling spec {spec!r}: expected a step count ('250'), section counts ('10,15,20') or 'ddimN'")
    return ",".join(str(int(p)) for p in parts)


def space_timesteps(num_timesteps: int, section_counts) -> set:
    """The set of original timesteps to keep.

    section_counts: a list of ints or a string "a,b,c": the T steps are cut into len(counts) equal sections
    (the first T % len sections one longer) and each section keeps its count of evenly strided steps.
    "ddimN" keeps range(0, T, stride) for the integer stride that gives exactly N steps (DDIM's spacing).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return set(range(0, num_timesteps, stride))
            if want == num_timesteps:
                return set(range(num_timesteps))
            raise ValueError(f"cannot create exactly {want} steps with an integer stride from {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)
