"""Short, unique display names from paths and Hub ids."""

from alibi_dinov2.names import short_names


def test_last_part_unless_two_would_collide():
    names = ["/tmp/run1/student-alibi", "facebook/dinov2-small", "outputs/a/model", "outputs/b/model/"]
    assert short_names(names) == ["student-alibi", "dinov2-small", "a/model", "b/model"]


def test_builtin_sets_and_exact_duplicates():
    assert short_names(["noise:20", "micro", "textures"]) == ["noise:20", "micro", "textures"]
    assert short_names(["x/m", "x/m"]) == ["x/m", "x/m#2"]
    shown = short_names(["/data/2024/imgs", "/data/2025/imgs", "/other/imgs2"])
    assert shown == ["2024/imgs", "2025/imgs", "imgs2"] and len(set(shown)) == 3
