use super::*;

fn member(id: u64, voter: bool, healthy: bool) -> MemberView {
    MemberView {
        id,
        name: format!("n{id}"),
        address: format!("127.0.0.1:{}", 7000 + id),
        voter,
        healthy,
        matched_index: Some(10),
        last_contact_ms: Some(5),
    }
}

#[test]
fn a_healthy_learner_is_promoted_while_voters_are_below_target() {
    let members = [
        member(1, true, true),
        member(2, false, true),
        member(3, false, true),
    ];
    assert_eq!(plan(&members, 3), vec![MembershipAction::Promote(2)]);
}

#[test]
fn learners_stay_learners_once_the_target_is_reached() {
    let members = [
        member(1, true, true),
        member(2, true, true),
        member(3, true, true),
        member(4, false, true),
    ];
    assert_eq!(plan(&members, 3), vec![]);
}

#[test]
fn an_unhealthy_learner_is_not_promoted() {
    let members = [
        member(1, true, true),
        member(2, true, true),
        member(4, false, false),
        member(5, false, true),
    ];
    assert_eq!(plan(&members, 3), vec![MembershipAction::Promote(5)]);
    assert_eq!(plan(&members[..3], 3), vec![]);
}

#[test]
fn five_voters_are_filled_one_at_a_time() {
    let members = [
        member(1, true, true),
        member(2, true, true),
        member(3, true, true),
        member(4, false, true),
        member(5, false, true),
    ];
    assert_eq!(plan(&members, 5), vec![MembershipAction::Promote(4)]);
}
