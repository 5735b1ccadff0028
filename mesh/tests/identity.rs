//! A node's identity on disk: created once, loaded thereafter, refused on another
//! machine.

use std::fs;

use hearth_mesh::identity::{Identity, IdentityError, MachineId, HOST_FILE, KEY_FILE};

fn this_machine() -> MachineId {
    MachineId::from_raw("machine-a")
}

#[test]
fn created_then_loaded_with_the_same_id() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("nested/data");
    let created = Identity::load_or_create_on(&data, &this_machine()).unwrap();
    let loaded = Identity::load_or_create_on(&data, &this_machine()).unwrap();
    assert_eq!(created.node_id(), loaded.node_id());
    assert_eq!(created.peer_id(), loaded.keypair().public().to_peer_id());
    assert_eq!(created.node_id().0, created.peer_id().to_base58());
    assert!(data.join(KEY_FILE).is_file());
    assert!(data.join(HOST_FILE).is_file());
    // No temporary files are left behind.
    assert_eq!(fs::read_dir(&data).unwrap().count(), 2);
}

#[test]
fn each_data_folder_gets_its_own_id() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Identity::load_or_create_on(a.path(), &this_machine()).unwrap();
    let b = Identity::load_or_create_on(b.path(), &this_machine()).unwrap();
    assert_ne!(a.node_id(), b.node_id());
}

#[test]
fn debug_output_shows_no_secret() {
    let identity = Identity::generate();
    let shown = format!("{identity:?}");
    assert!(shown.contains(&identity.node_id().0), "{shown}");
    assert!(!shown.to_lowercase().contains("key"), "{shown}");
}

#[cfg(unix)]
#[test]
fn key_and_host_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    Identity::load_or_create_on(dir.path(), &this_machine()).unwrap();
    for file in [KEY_FILE, HOST_FILE] {
        let mode = fs::metadata(dir.path().join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}: {mode:o}");
    }
}

#[test]
fn a_corrupt_key_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join(KEY_FILE);
    for contents in [&b""[..], b"not a key at all", &[0xff; 68], &[0u8; 10_000]] {
        fs::write(&key, contents).unwrap();
        let err = Identity::load_or_create_on(dir.path(), &this_machine()).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&key.display().to_string()), "{msg}");
        assert!(msg.contains("remove it"), "{msg}");
    }
}

#[test]
fn a_truncated_key_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    Identity::load_or_create_on(dir.path(), &this_machine()).unwrap();
    let key = dir.path().join(KEY_FILE);
    let bytes = fs::read(&key).unwrap();
    fs::write(&key, &bytes[..bytes.len() - 1]).unwrap();
    let err = Identity::load_or_create_on(dir.path(), &this_machine()).unwrap_err();
    assert!(matches!(err, IdentityError::Corrupt { .. }), "{err:?}");
}

#[test]
fn a_folder_from_another_machine_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    Identity::load_or_create_on(dir.path(), &this_machine()).unwrap();

    let err =
        Identity::load_or_create_on(dir.path(), &MachineId::from_raw("machine-b")).unwrap_err();
    assert!(matches!(err, IdentityError::OtherMachine { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("created on another machine"), "{msg}");
    assert!(msg.contains("two nodes must not share an id"), "{msg}");
    assert!(
        msg.contains(&format!("remove {}", dir.path().join(KEY_FILE).display())),
        "{msg}"
    );
    assert!(msg.contains("--data-dir"), "{msg}");
    // The raw machine ids never appear: the folder keeps only their hashes.
    assert!(
        !msg.contains("machine-a") && !msg.contains("machine-b"),
        "{msg}"
    );

    // Following the advice works: a new id on the new machine.
    let old = Identity::load_or_create_on(dir.path(), &this_machine()).unwrap();
    fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
    let new = Identity::load_or_create_on(dir.path(), &MachineId::from_raw("machine-b")).unwrap();
    assert_ne!(old.node_id(), new.node_id());
    let again = Identity::load_or_create_on(dir.path(), &MachineId::from_raw("machine-b")).unwrap();
    assert_eq!(new.node_id(), again.node_id());
}

#[test]
fn a_key_without_a_machine_record_is_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let created = Identity::load_or_create_on(dir.path(), &this_machine()).unwrap();
    fs::remove_file(dir.path().join(HOST_FILE)).unwrap();
    let loaded = Identity::load_or_create_on(dir.path(), &this_machine()).unwrap();
    assert_eq!(created.node_id(), loaded.node_id());
    assert!(dir.path().join(HOST_FILE).is_file());
    assert!(Identity::load_or_create_on(dir.path(), &MachineId::from_raw("machine-b")).is_err());
}

#[test]
fn a_corrupt_machine_record_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    Identity::load_or_create_on(dir.path(), &this_machine()).unwrap();
    fs::write(dir.path().join(HOST_FILE), "garbage").unwrap();
    let err = Identity::load_or_create_on(dir.path(), &this_machine()).unwrap_err();
    assert!(err.to_string().contains(HOST_FILE), "{err}");
}

#[test]
fn this_machine_loads_its_own_folder() {
    let dir = tempfile::tempdir().unwrap();
    let a = Identity::load_or_create(dir.path()).unwrap();
    let b = Identity::load_or_create(dir.path()).unwrap();
    assert_eq!(a.node_id(), b.node_id());
}
