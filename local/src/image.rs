//! The node image, built without a registry: a root filesystem holding a `flotilla` binary,
//! the shared libraries `ldd` lists for it (at the same paths), and busybox for a shell and
//! `ip`, imported with the engine's `docker import` call. Its tag is derived from the binary's
//! contents, so an unchanged build reuses its image.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use bollard::query_parameters::CreateImageOptionsBuilder;
use bollard::Docker;
use futures::StreamExt;

use crate::{docker_error, docker_status, io_error, labels, LocalError};

/// The repository of node images.
pub const NODE_IMAGE_REPOSITORY: &str = "flotilla/node";
/// Where the binary lives inside the image.
pub const BINARY_IN_IMAGE: &str = "/usr/local/bin/flotilla";
/// Where busybox (a static build, Debian's `busybox-static`) is on the host.
const BUSYBOX_ON_HOST: &str = "/bin/busybox";

/// The shared libraries in `ldd` output, by path (the vdso has none and is skipped).
pub fn parse_ldd(output: &str) -> Vec<PathBuf> {
    let mut paths = BTreeSet::new();
    for line in output.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, target)) => target.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|path| path.starts_with('/')) {
            paths.insert(PathBuf::from(path));
        }
    }
    paths.into_iter().collect()
}

fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, LocalError> {
    let output = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(io_error(format!("run ldd on {}", binary.display())))?;
    // A static binary: ldd says "not a dynamic executable" and fails; nothing to copy.
    if !output.status.success() {
        return Ok(Vec::new());
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&output.stdout)))
}

fn busybox_applets() -> Result<Vec<String>, LocalError> {
    let output = std::process::Command::new(BUSYBOX_ON_HOST)
        .arg("--list")
        .output()
        .map_err(io_error(format!(
            "run {BUSYBOX_ON_HOST} --list (install Debian's busybox-static; scripts/setup.sh does)"
        )))?;
    if !output.status.success() {
        return Err(LocalError::Command {
            action: format!("run {BUSYBOX_ON_HOST} --list"),
            message: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|applet| !applet.is_empty() && !applet.contains('/'))
        .map(str::to_owned)
        .collect())
}

fn read(path: &Path) -> Result<Vec<u8>, LocalError> {
    std::fs::read(path).map_err(io_error(format!("read {}", path.display())))
}

fn append_file(
    archive: &mut tar::Builder<Vec<u8>>,
    path: &str,
    contents: &[u8],
    mode: u32,
) -> Result<(), LocalError> {
    let mut header = tar::Header::new_gnu();
    header.set_size(contents.len() as u64);
    header.set_mode(mode);
    header.set_entry_type(tar::EntryType::Regular);
    archive
        .append_data(&mut header, path.trim_start_matches('/'), contents)
        .map_err(io_error(format!("add {path} to the image archive")))
}

fn append_directory(archive: &mut tar::Builder<Vec<u8>>, path: &str) -> Result<(), LocalError> {
    let mut header = tar::Header::new_gnu();
    header.set_size(0);
    header.set_mode(0o755);
    header.set_entry_type(tar::EntryType::Directory);
    archive
        .append_data(&mut header, path.trim_start_matches('/'), std::io::empty())
        .map_err(io_error(format!("add {path} to the image archive")))
}

fn append_symlink(
    archive: &mut tar::Builder<Vec<u8>>,
    path: &str,
    target: &str,
) -> Result<(), LocalError> {
    let mut header = tar::Header::new_gnu();
    header.set_size(0);
    header.set_mode(0o777);
    header.set_entry_type(tar::EntryType::Symlink);
    archive
        .append_link(&mut header, path.trim_start_matches('/'), target)
        .map_err(io_error(format!(
            "add the link {path} to the image archive"
        )))
}

/// The files of the image and the tag naming their contents.
struct RootFilesystem {
    archive: Vec<u8>,
    tag: String,
}

fn build_root_filesystem(binary: &Path) -> Result<RootFilesystem, LocalError> {
    let binary_bytes = read(binary)?;
    let libraries = shared_libraries(binary)?;
    let busybox = read(Path::new(BUSYBOX_ON_HOST))?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    binary_bytes.hash(&mut hasher);
    let mut library_files = Vec::new();
    for library in &libraries {
        let bytes = read(library)?;
        library.hash(&mut hasher);
        bytes.len().hash(&mut hasher);
        library_files.push((library.clone(), bytes));
    }
    busybox.len().hash(&mut hasher);
    let tag = format!("{:016x}", hasher.finish());

    let mut archive = tar::Builder::new(Vec::new());
    let mut directories = BTreeSet::from([
        "/bin".to_string(),
        "/usr".into(),
        "/usr/local".into(),
        "/usr/local/bin".into(),
        "/data".into(),
        "/tmp".into(),
        "/etc".into(),
    ]);
    for (library, _) in &library_files {
        let mut parent = library.parent();
        while let Some(directory) = parent.filter(|p| p != &Path::new("/")) {
            directories.insert(directory.to_string_lossy().into_owned());
            parent = directory.parent();
        }
    }
    for directory in &directories {
        append_directory(&mut archive, directory)?;
    }
    append_file(&mut archive, BINARY_IN_IMAGE, &binary_bytes, 0o755)?;
    for (library, bytes) in &library_files {
        append_file(&mut archive, &library.to_string_lossy(), bytes, 0o755)?;
    }
    append_file(&mut archive, "/bin/busybox", &busybox, 0o755)?;
    for applet in busybox_applets()? {
        if applet != "busybox" {
            append_symlink(&mut archive, &format!("/bin/{applet}"), "busybox")?;
        }
    }
    append_file(
        &mut archive,
        "/etc/passwd",
        b"root:x:0:0:root:/:/bin/sh\n",
        0o644,
    )?;
    let archive = archive
        .into_inner()
        .map_err(io_error("finish the image archive"))?;
    Ok(RootFilesystem { archive, tag })
}

/// Returns the node image for `binary` (`flotilla/node:<content hash>`), importing it first
/// unless the daemon already has it.
pub async fn ensure_node_image(docker: &Docker, binary: &Path) -> Result<String, LocalError> {
    let binary_owned = binary.to_path_buf();
    let root = tokio::task::spawn_blocking(move || build_root_filesystem(&binary_owned))
        .await
        .map_err(|error| LocalError::Command {
            action: "build the node image archive".into(),
            message: error.to_string(),
        })??;
    let image = format!("{NODE_IMAGE_REPOSITORY}:{}", root.tag);
    match docker.inspect_image(&image).await {
        Ok(_) => return Ok(image),
        Err(error) if docker_status(&error) == Some(404) => {}
        Err(error) => return Err(docker_error(format!("inspect image {image}"))(error)),
    }
    let options = CreateImageOptionsBuilder::default()
        .from_src("-")
        .repo(NODE_IMAGE_REPOSITORY)
        .tag(&root.tag)
        .changes(vec![
            format!("LABEL {}=true", labels::NODE_IMAGE),
            format!("ENTRYPOINT [\"{BINARY_IN_IMAGE}\"]"),
        ])
        .build();
    let body = bollard::body_full(root.archive.into());
    let mut progress = docker.create_image(Some(options), Some(body), None);
    while let Some(step) = progress.next().await {
        step.map_err(docker_error(format!("import the node image {image}")))?;
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_every_library_path_and_the_loader() {
        let output = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibrocksdb.so.7.8 => /lib/x86_64-linux-gnu/librocksdb.so.7.8 (0x00007f)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(output),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib/x86_64-linux-gnu/librocksdb.so.7.8"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn a_library_ldd_cannot_find_is_not_listed() {
        assert!(parse_ldd("\tlibmissing.so => not found\n").is_empty());
    }
}
