"""``pddnet apply``: warp an image or a label map with a displacement field
(:func:`pddnet.runtime.fields.apply_field_files`, torch-free)."""

from __future__ import annotations

import click

from pddnet.cli.errors import friendly


@click.command("apply")
@click.option("--field", "field_path", required=True, type=click.Path(dir_okay=False),
              help="The displacement field: pddnet's disp.nii.gz or disp.npz (voxels), or an "
                   "ITK/ANTs displacement field (disp_itk.nii.gz, *Warp.nii.gz: mm, LPS).")
@click.option("--image", required=True, type=click.Path(dir_okay=False),
              help="The image to warp (NIfTI, any grid in the moving scan's world space).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The warped image (.nii.gz), written atomically on the field's grid.")
@click.option("--labels", is_flag=True,
              help="--image is a label map: nearest neighbour, written as uint8 (default: "
                   "trilinear, float32).")
@click.option("--reference", type=click.Path(dir_okay=False),
              help="The fixed image the field was computed for: checked to be on the field's "
                   "grid; needed for a disp.npz without its summary.json.")
@click.option("--max-voxels", type=click.IntRange(min=1), default=None,
              help="Largest grid accepted, in voxels (default 268435456), checked from each "
                   "file's header before it is read.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@friendly
def apply(field_path, image, out, labels, reference, max_voxels, overwrite) -> None:
    """Warp an image or label map with a displacement field, as `pddnet register` does.

    out(x) = image(x + u(x)) on the field's (the fixed image's) grid, the image sampled in
    world coordinates; trilinear for images, nearest for --labels; outside the image's field of
    view, the value of the nearest border voxel (SimpleITK and ANTs use 0 there).
    """
    from pddnet.data.io import DEFAULT_MAX_VOXELS
    from pddnet.runtime.fields import apply_field_files

    done = apply_field_files(field_path, image, out, labels=labels, reference=reference,
                             overwrite=overwrite, max_voxels=max_voxels or DEFAULT_MAX_VOXELS)
    shape = "x".join(str(n) for n in done["shape"])
    kind = "label map" if labels else "image"
    click.echo(f"{image} -> {done['out']} ({kind}, {shape}, field: {done['field']})")
    if done["outside"] > 0:
        click.echo(f"note: {100 * done['outside']:.1f}% of the target points fall outside the "
                   "image; they hold its border values")


COMMANDS = (apply,)
