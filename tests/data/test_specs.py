"""Dataset specs of the command line: CSV manifests with their own column names."""

import numpy as np
import pytest
from PIL import Image

from tfmir.data.specs import load_spec


def _manifest(tmp_path):
    rows = ["image,diagnosis,lesion"]
    for index in range(8):
        Image.fromarray(np.full((12, 12, 3), 30 * index, np.uint8)).save(tmp_path / f"{index}.png")
        Image.fromarray(np.eye(12, dtype=np.uint8) * 255).save(tmp_path / f"{index}_mask.png")
        rows.append(f"{index}.png,{'nevus' if index % 2 else 'melanoma'},{index}_mask.png")
    path = tmp_path / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_csv_columns_after_a_hash(tmp_path):
    path = _manifest(tmp_path)
    splits = load_spec(f"skin={path}#path=image,label=diagnosis,mask=lesion")
    assert sum(len(part) for part in splits.values()) == 8
    train = splits["train"]
    assert train.class_names == ("melanoma", "nevus") and set(train.sources) == {"skin"}
    assert all(mask.endswith("_mask.png") for mask in train.mask_paths)


@pytest.mark.parametrize("mapping, message", [
    ("path=image,label", "name=header pairs"),
    ("path=image,colour=diagnosis", "columns keys must be among path, label, source, mask"),
])
def test_bad_column_mappings_are_named(tmp_path, mapping, message):
    path = _manifest(tmp_path)
    with pytest.raises(ValueError, match=message):
        load_spec(f"{path}#{mapping}")


def test_ph2_reads_with_its_own_headers(shared_data_dir):
    path = shared_data_dir / "ph2" / "labels.csv"
    if not path.exists():
        pytest.skip(f"PH2 is not in the real data folder {shared_data_dir}")
    splits = load_spec(f"ph2={path}#path=image,label=diagnosis_name,mask=mask")
    assert sum(len(part) for part in splits.values()) == 200
    assert splits["train"].class_names == ("atypical_nevus", "common_nevus", "melanoma")
